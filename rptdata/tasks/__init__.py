"""`rpt make-tasks`: scored positions -> RPT tasks (paper Sec. 3.2), one module per idea.

taskdef.py  what a task is: the context cut, the continuation, its id, the train/eval split
live.py     the live-group estimate: P(a group of G samples at T has mixed rewards)
config.py   MakeTasksConfig (the options) and the skip reasons
inputs.py   the scored and prepared shards, read side by side (`open_inputs`, `load_shard`)
build.py    the stage: one shard of positions -> train and eval task shards, the manifest

manifest = run_make_tasks(MakeTasksConfig(scored="out/scored", out="out/tasks"))
"""

from rptdata.tasks.build import run_make_tasks
from rptdata.tasks.config import SKIP_REASONS, STAGE, MakeTasksConfig

__all__ = ["MakeTasksConfig", "SKIP_REASONS", "STAGE", "run_make_tasks"]
