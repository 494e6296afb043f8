"""Train a task's teachers (when missing) and distil them into a student.

    python train.py --task B --alpha 0.6 --student_model ResNet18
"""
import sys

import tasks
from mtkd.config import apply_config, explicit_flags, get_args_parser
from mtkd.errors import UserError
from mtkd.report import print_error
from mtkd.trainer import run


def main(argv=None) -> int:
    parser = get_args_parser(tasks.list_tasks())
    apply_config(parser, argv)
    args = parser.parse_args(argv)
    try:
        run(args, explicit=explicit_flags(parser, argv))
    except UserError as e:
        print_error(e)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
