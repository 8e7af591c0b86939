"""The one exception type for mistakes a user can fix.

Anything raised as `UserError` is printed by the CLI as a single paragraph (no traceback)
and exits with status 2. The message must name the offending thing and say what would be
valid, e.g. "model 'tubevit-x' is unknown; valid names: tubevit-ti, tubevit-s, ...".
"""


class UserError(Exception):
    """A bad config, CLI argument, shard, checkpoint or input file."""
