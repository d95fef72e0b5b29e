class LaunchError(Exception):
    """A problem the user can fix; `launch` prints its message (no traceback) and exits non-zero."""
