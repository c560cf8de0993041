"""Trial environments stepped in a worker process, so that an agent's step overlaps the environments'.

The evaluator's ``pipelined`` mode splits a batch of trials into two groups, each a sync vector
environment in its own worker process: while one group's environments step, the main process computes
the other group's actions. Meta-World's step holds the GIL, so threads cannot overlap the two
(docs/benchmarks.md); processes can. One process per group, not per trial (gymnasium's
``AsyncVectorEnv``): one pipe round trip per group and step instead of one per trial.

Not for: which agent acts (``evaluation.py``), the environments themselves (``suites.py``).
"""

from __future__ import annotations

import multiprocessing as mp
import signal
from typing import Sequence

import numpy as np

from icl_metarl.harness.suites import TaskSpec, make_trial_envs

_START_TIMEOUT_S = 300.0  # a worker imports Meta-World and MuJoCo first: seconds, minutes on a loaded machine


class WorkerError(RuntimeError):
    """A worker process failed, or died; the message says which command and why."""


def _serve(conn, tasks: list[TaskSpec], episode_length: int, seed: int, action_repeat: int = 1) -> None:
    """The worker's loop: build the group's sync vector env, then answer reset/step until close."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which closes this worker
    try:
        envs = make_trial_envs(tasks, episode_length, seed=seed, mode="sync", action_repeat=action_repeat)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"building the environments: {type(e).__name__}: {e}"))
        conn.close()
        return
    conn.send(("ok", None))
    try:
        while True:
            try:
                cmd, arg = conn.recv()
            except EOFError:  # the parent is gone
                break
            if cmd == "close":
                break
            try:
                out = envs.reset() if cmd == "reset" else envs.step(arg)
            except BaseException as e:  # noqa: BLE001
                conn.send(("error", f"{cmd}: {type(e).__name__}: {e}"))
                continue
            conn.send(("ok", out))
    finally:
        envs.close()
        conn.close()


class EnvGroupWorker:
    """A sync vector environment of ``tasks`` (one trial each) living in a worker process.

    The same trials, seeds and outcomes as ``make_trial_envs(tasks, episode_length, seed)`` in this
    process; ``step_async`` returns at once and ``step_wait`` collects the step's outcome.
    """

    def __init__(self, tasks: Sequence[TaskSpec], episode_length: int, seed: int = 0, action_repeat: int = 1):
        ctx = mp.get_context("spawn")  # fork would copy torch's thread pools and the agent's memory
        self.num_envs = len(tasks)
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child, list(tasks), int(episode_length), int(seed), int(action_repeat)),
                                    daemon=True, name="icl-metarl-envs")
        self._process.start()
        child.close()
        self._pending: str | None = "start"
        self._closed = False

    def _wait(self, what: str, timeout: float | None = None):
        if timeout is not None and not self._conn.poll(timeout):
            self.close()
            raise WorkerError(f"environment worker did not answer {what} within {timeout:.0f} s")
        try:
            status, out = self._conn.recv()
        except EOFError:
            code = self._process.exitcode
            self.close()
            raise WorkerError(f"environment worker died during {what} (exit code {code})") from None
        if status != "ok":
            raise WorkerError(f"environment worker failed: {out}")
        return out

    def wait_started(self) -> None:
        """Block until the worker has built its environments (raise WorkerError if it could not)."""
        if self._pending == "start":
            self._pending = None
            self._wait("start", _START_TIMEOUT_S)

    def _send(self, cmd: str, arg=None) -> None:
        self.wait_started()
        if self._pending is not None:
            raise RuntimeError(f"environment worker: {cmd} sent while {self._pending} is pending")
        try:
            self._conn.send((cmd, arg))
        except (BrokenPipeError, ConnectionResetError, OSError):
            code = self._process.exitcode
            self.close()
            raise WorkerError(f"environment worker died before {cmd} (exit code {code})") from None
        self._pending = cmd

    def _collect(self, cmd: str):
        self.wait_started()
        if self._pending != cmd:
            raise RuntimeError(f"environment worker: waiting for {cmd}, but {self._pending} is pending")
        self._pending = None
        return self._wait(cmd)

    def reset_async(self) -> None:
        self._send("reset")

    def reset_wait(self):
        return self._collect("reset")

    def reset(self):
        self.reset_async()
        return self.reset_wait()

    def step_async(self, actions: np.ndarray) -> None:
        self._send("step", np.asarray(actions, dtype=np.float32))

    def step_wait(self):
        return self._collect("step")

    def step(self, actions: np.ndarray):
        self.step_async(actions)
        return self.step_wait()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._process.is_alive():
                self._conn.send(("close", None))
        except (BrokenPipeError, OSError):
            pass
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class InProcessEnvs:
    """A gymnasium vector env behind the same ``reset``/``step_async``/``step_wait`` as a worker, so one
    playing loop serves both (the step happens in ``step_wait``: nothing to overlap in one process)."""

    def __init__(self, envs):
        self._envs = envs
        self.num_envs = envs.num_envs
        self._actions = None

    def wait_started(self) -> None:
        pass

    def reset_async(self) -> None:
        pass

    def reset_wait(self):
        return self._envs.reset()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self):
        actions, self._actions = self._actions, None
        return self._envs.step(actions)

    def close(self) -> None:
        self._envs.close()


def split_in_two(n: int) -> list[slice]:
    """The two groups of a pipelined batch of ``n`` trials (one group if ``n`` is 1)."""
    if n < 2:
        return [slice(0, n)]
    half = (n + 1) // 2
    return [slice(0, half), slice(half, n)]
