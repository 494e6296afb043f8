"""Train a task's teachers (when missing) and distil them into a student.

    python train.py --task B --alpha 0.6 --student_model ResNet18
"""
import sys

import tasks
from mtkd.config import explicit_flags, get_args_parser
from mtkd.errors import UserError
from mtkd.report import error_console
from mtkd.trainer import run


def main(argv=None) -> int:
    parser = get_args_parser(tasks.list_tasks())
    args = parser.parse_args(argv)
    try:
        run(args, explicit=explicit_flags(parser, argv))
    except UserError as e:
        error_console.print(f"[bold red]error:[/] {e}")
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
