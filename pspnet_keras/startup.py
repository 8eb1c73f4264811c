"""Imported first by every command: Ctrl-C or SIGTERM while the command starts exits at once, quietly.

Python turns Ctrl-C into KeyboardInterrupt, which prints a traceback when it comes
while modules are imported, before a command can catch it. From this import until
cli.run_command takes over (the command's work, which cleans up and exits the same
way), SIGINT and SIGTERM print `PROG: interrupted` or `PROG: terminated` and end the
process with 130 or 143 (128 + the signal's number, as shells report it). Nothing
is written before run_command, so there is nothing to clean up.
"""

import os
import signal
import sys

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
REASONS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


def exit_at_once(signum, frame):
    """Ends the process: one line naming the program and the signal, exit status 130 or 143."""
    os.write(2, f"{os.path.basename(sys.argv[0])}: {REASONS[signum]}\n".encode())
    os._exit(EXIT_CODES[signum])


for stopping_signal in EXIT_CODES:
    signal.signal(stopping_signal, exit_at_once)
