"""`python -m selfalign_ray.report DIR [DIR ...]`: rebuild the report of finished (or killed) runs."""

import sys

from selfalign_ray.report.build import build_report


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    for out in argv:
        print(build_report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
