"""camelid plan (being built)."""

from camelid.errors import CamelidError


def add_arguments(p):
    pass


def main(args):
    raise CamelidError("camelid plan is not built yet")
