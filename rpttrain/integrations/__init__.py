"""Adapters that let distributed trainers (verl, TRL) use the rpt reward."""
