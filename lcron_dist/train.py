"""`lcron-train --config configs/NAME.toml [--section.field=value ...]`: entry point only."""

from __future__ import annotations

import argparse
import sys

from lcron_dist.config import load_config
from lcron_dist.distributed.process_group import teardown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lcron-train", description=__doc__,
        epilog="Any config field can be overridden: --data.path=DIR --loss.name=bce --train.seed=1 "
               "--run.dir=DIR --loss.options.tau=20 ...",
    )
    parser.add_argument("--config", required=True, help="TOML recipe, e.g. configs/small-2stage.toml")
    args, overrides = parser.parse_known_args(argv)
    try:
        config = load_config(args.config, overrides)
    except ValueError as exc:
        parser.error(str(exc))
    from lcron_dist.components.finite import NonFiniteLoss
    from lcron_dist.trainer import Trainer  # heavy imports only once the config is known to be valid

    failed = True
    try:
        Trainer(config).run()
        failed = False
    except ValueError as exc:  # bad input (config, data, device support): a message, not a traceback
        print(f"lcron-train: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLoss as exc:  # the run diverged: lower the learning rate (or clip) and restart
        print(f"lcron-train: error: {exc}", file=sys.stderr)
        return 3
    finally:
        teardown(failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
