"""Several training processes (accelerate / torchrun): how distillery starts them (which one this is: toolchain.ui).

Under ``accelerate launch`` (or torchrun) every process runs the same command; RANK / WORLD_SIZE say which one
it is. All of them train; only rank 0 prints, writes checkpoints and files, and publishes the stage.
"""

from __future__ import annotations

import os
import subprocess
import sys


def launch_command(args: list[str], processes: int, config_file: str | None = None) -> list[str]:
    """``accelerate launch`` for ``python ARGS`` on ``processes`` processes (the CLI passes ``-m <itself> ...``).

    Without a config file, several processes need accelerate's torchrun path (--multi_gpu): plain
    ``--num_processes N`` with no GPU silently starts one process. On a machine without CUDA the processes
    then train on the CPU over gloo. A config file (FSDP, several machines, mixed precision) decides the rest.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        cmd += ["--config_file", config_file]
    elif processes > 1:
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes:
        cmd += ["--num_processes", str(processes)]
    return cmd + list(args)


def launch(args: list[str], processes: int, config_file: str | None = None) -> int:
    """Run the command under accelerate; return its exit code.

    The processes' own output passes through. When one fails it has already said why in one line; the
    launcher's log lines and its Python traceback after that (torchrun's ChildFailedError) are dropped unless
    DISTILLERY_DEBUG is set.
    """
    env = {**os.environ, "DISTILLERY_LAUNCHED": "1"}
    if processes > 1 and "OMP_NUM_THREADS" not in env:  # the cores shared out, instead of torchrun's 1 thread each
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    if os.environ.get("DISTILLERY_DEBUG"):
        return subprocess.call(launch_command(args, processes, config_file), env=env)
    proc = subprocess.Popen(launch_command(args, processes, config_file), env=env, stderr=subprocess.PIPE,
                            text=True, errors="replace")
    dropping = False
    for line in proc.stderr:
        dropping = dropping or line.startswith("Traceback (most recent call last)") or "ChildFailedError" in line
        if not dropping and "torch/distributed/elastic" not in line:  # torchrun's own log lines
            sys.stderr.write(line)
            sys.stderr.flush()
    return proc.wait()
