"""Entry point: python -m training.epa --model … --data … --output-dir …"""
import sys

from epa_kernels.transformers import PreferenceDataError
from training.epa.cli import TrainError, parse_args
from training.models import ModelLoadError


def main(argv=None) -> int:
    args = parse_args(argv)
    from training.epa.trainer import run

    try:
        run(args)
    except (TrainError, PreferenceDataError, ModelLoadError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
