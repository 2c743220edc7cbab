"""Exit codes of every ``klaviyo-bridge`` command, defined once (sysexits(3) where systemd or scripts care).

systemd's unit uses ``RestartPreventExitStatus=78`` so a configuration that can never work does not restart
in a loop; scripts and monitoring read the others. ``status --check`` follows the monitoring-plugins
convention instead (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN), listed separately below.
"""

from __future__ import annotations

from typing import Final

EX_OK: Final = 0  # done; the daemon stopped cleanly
EX_FATAL: Final = 1  # an unusable state DB, a failed command, an internal error
EX_UNHEALTHY: Final = 2  # `status`: an enabled customer has not completed a poll within 3 poll intervals
EX_USAGE: Final = 64  # a malformed command line (unknown option, a date or id that is not one, out of range)
EX_TEMPFAIL: Final = 75  # try again later (e.g. `resync` while the daemon renews the Whiplash token)
EX_CONFIG: Final = 78  # the configuration is invalid: one line per problem on stderr

# `status --check` (Nagios / Icinga / monitoring-plugins).
CHECK_OK: Final = 0
CHECK_WARNING: Final = 1
CHECK_CRITICAL: Final = 2
CHECK_UNKNOWN: Final = 3

CONFIG_HELP: Final = "config file (default: $KLAVIYO_BRIDGE_CONFIG or /etc/klaviyo-bridge/config.toml)"

EPILOG: Final = """exit codes:
  0   ok
  1   fatal: unusable state database, failed command, internal error
  2   status: an enabled customer has not completed a poll within 3 poll intervals
  64  usage: the command line is malformed
  75  try again later (resync while the daemon renews its Whiplash token)
  78  configuration invalid (one line per problem on stderr)
  status --check: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (monitoring-plugins convention)"""
