#!/bin/sh
# A service whose worker can be restarted through a control socket in /var/run.
# /var/run is a shared volume: a sidekick started with --volumes-from reaches the socket.
#   /var/run/ctl.sock     control socket ("restart" restarts the worker)
#   /var/run/worker.gen   how many times the worker was started
#   /var/run/worker.pid   the running worker's pid
RUN=/var/run

start_worker() {
    gen=$(( $(cat "$RUN/worker.gen" 2>/dev/null || echo 0) + 1 ))
    ( while :; do echo "$gen $(date +%s)" >> "$RUN/worker.log"; sleep 1; done ) &
    echo "$!" > "$RUN/worker.pid"
    echo "$gen" > "$RUN/worker.gen"
}

start_worker
ctlsock serve "$RUN/ctl.sock" | while read -r cmd; do
    case "$cmd" in
        restart) kill "$(cat "$RUN/worker.pid")"; start_worker ;;
        *) echo "unknown command: $cmd" >&2 ;;
    esac
done &
# As PID 1 the shell gets no default signal handling: stop promptly on docker stop.
trap 'exit 0' TERM INT
wait
