"""A process that has imported torch and the daemon once, and forks `streamrnn serve`
(one process, or torchrun's launcher) for each test that starts one.

`python -m streamrnn serve` spends ~2 CPU-s of its start in `import torch`, and the
durability and cluster tests start daemons some two hundred times: on a 2-core machine
that was a third of the suite's time. A forked child is the same daemon from the same
code, a real process of its own (signals, SIGKILL, its own files, sockets and exit
status); only the import is shared. The ranks that a launcher starts are still fresh
`python -m streamrnn serve` processes, as torchrun starts them.

    python tests/zygote.py SOCKET     (harness.Zygote starts it, one per test process)

Requests on the Unix socket, a JSON line each, answered with one:
    {"op": "spawn", "argv": [...], "env": {...}, "cwd": ..., "log": ..., "new_session": b}
        -> {"pid": N}        argv as after `python -m streamrnn`; stdout and stderr
                             appended to `log`
    {"op": "status", "pid": N} -> {"returncode": None | code (-signal when killed)}
It ends when its client goes away.
"""
from __future__ import annotations

import io
import json
import os
import select
import socket
import sys
import traceback


def main(path: str) -> None:
    import importlib
    # what every child would import first: torch, the launcher's torchrun (serve
    # --nproc), the daemon with its loop and recovery
    for module in ("torch", "torch.distributed.run", "streamrnn.serve.launch"):
        importlib.import_module(module)
    from streamrnn import cli

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    clients: dict[socket.socket, bytes] = {}
    exited: dict[int, int] = {}
    served = False
    while clients or not served:
        readable, _, _ = select.select([listener, *clients], [], [], 0.05)
        _reap(exited)
        for s in readable:
            if s is listener:
                clients[listener.accept()[0]] = b""
                served = True
                continue
            data = s.recv(1 << 16)
            if not data:
                del clients[s]
                s.close()
                continue
            clients[s] += data
            while b"\n" in clients[s]:
                line, clients[s] = clients[s].split(b"\n", 1)
                request = json.loads(line)
                if request["op"] == "spawn":
                    pid = os.fork()
                    if pid == 0:
                        listener.close()
                        for client in clients:
                            client.close()
                        _child(request, cli.main)  # does not return
                    reply = {"pid": pid}
                else:
                    _reap(exited)
                    reply = {"returncode": exited.get(request["pid"])}
                s.sendall(json.dumps(reply).encode() + b"\n")


def _reap(exited: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        exited[pid] = os.waitstatus_to_exitcode(status)


def _child(request: dict, main) -> None:
    """Become `python -m streamrnn ARGV` as Popen would have started it (stdin from
    /dev/null, stdout and stderr to the log, unbuffered), then exit as it would."""
    code: object = 1
    try:
        if request["new_session"]:
            os.setsid()
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [sys.executable, *request["argv"]]
        code = main(request["argv"])
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    # the interpreter's own exit, as `sys.exit(main())` ends: atexit handlers, then
    # waiting for threads that are not daemons
    raise SystemExit(code)


if __name__ == "__main__":
    main(sys.argv[1])
