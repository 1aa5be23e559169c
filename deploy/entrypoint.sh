#!/bin/sh
# Container entrypoint: exec the wrapper so that it is PID 1 and receives SIGTERM itself (it
# turns /ready off, drains for IW_DRAIN_TIMEOUT_S, unloads and exits 0). Any other command runs
# as given (a shell for debugging).
set -eu
if [ "$#" -eq 0 ]; then
  set -- serve
fi
case "$1" in
  serve | validate | --version | --help | -h)
    exec inference-wrapper "$@"
    ;;
esac
exec "$@"
