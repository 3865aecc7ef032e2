"""``mlxft``: a thin click shell. Each command module defines its commands; this adds them.

Results go to stdout (``--json`` for machines); logs and progress go to stderr. ``MlxftError``s
become clean messages: exit 2 for bad input the user can fix, 1 for everything else.
"""

from __future__ import annotations

import click

from mlx_ft.cli_eval import eval_cmd
from mlx_ft.cli_run import run_cmd
from mlx_ft.cli_select import fuse_cmd, pick_best_cmd, report_cmd
from mlx_ft.cli_train import doctor, import_gguf_cmd, train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlxft")
def main() -> None:
    """Fine-tune with mlx-lm, evaluate every checkpoint on tool calls, pick the best by eval
    score (not validation loss), fuse and quantize it.

    \b
    The whole loop in one resumable command:
      mlxft run -c configs/demo.yaml
    \b
    Or stage by stage:
      mlxft train -c configs/demo.yaml
      mlxft eval --prompts evals/tools.yaml --run runs/demo
      mlxft pick-best --run runs/demo
      mlxft fuse --run runs/demo --bits 5
      mlxft report --run runs/demo
    """


for command in (run_cmd, import_gguf_cmd, train, doctor, eval_cmd, pick_best_cmd, fuse_cmd, report_cmd):
    main.add_command(command)
