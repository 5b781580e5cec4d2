"""``python -m pyro_lvae`` runs the command line (:mod:`pyro_lvae.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
