"""One exception for bad input: the command line turns it into exit 2 and a one-line message."""


class UserError(Exception):
    """Bad input from the user (a scenario key, a path, an option). The message names what is wrong."""
