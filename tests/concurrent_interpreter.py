"""Run the programs of an interpreted Triton launch concurrently: one thread per program.

Triton's interpreter runs the programs of a launch one after another, so programs that spin-wait
for each other (the persistent kernel's group barrier) would wait forever. Inside
`concurrent_programs()` every launch starts one thread per program instead, and each atomic
operation first sleeps a random short time, so that arrivals and polls interleave differently on
every run. Tensors are shared between the threads (the interpreter's CPU storages are not
copied per program); the program index becomes per-thread.

Written against the interpreter of Triton 3.6 to 3.9 (GridExecutor.__call__, InterpreterBuilder.grid_idx), alike in
what it uses; CI runs it under each.
"""
import contextlib
import inspect
import random
import threading
import time

import triton
from triton.runtime import interpreter

from tritonrnn.kernels import occupancy

MAX_SLEEP_S = 2e-4  # at each atomic: short against a program's step (milliseconds interpreted)
TIMEOUT_S = 120.0  # a launch that has not finished by then is stuck (a barrier that never opens)
CONCURRENT_CAPACITY = 1 << 20  # every program of a launch is resident: it has its own thread
_schedule = random.Random()  # the sleeps' source (seeded per harness; thread order varies anyway)


class ProgramsStuck(RuntimeError):
    pass


def _concurrent_call(self, *args_dev, **kwargs):
    """GridExecutor.__call__ of triton 3.6 with its loop over the grid replaced by threads."""
    argspec = inspect.getfullargspec(self.fn)
    kwargs = {k: v for k, v in kwargs.items() if k in argspec.args}
    args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
    for hook in self.pre_run_hooks:
        hook(*args_hst, **kwargs_hst)
    patch_scope = interpreter._patch_lang(self.fn)
    try:
        args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
        args = {name: arg if name in self.constexprs else interpreter._implicit_cvt(arg) for name, arg in args.items()}
        grid = self.grid(args) if callable(self.grid) else self.grid
        grid = tuple(grid) + (1,) * (3 - len(grid))
        interpreter.interpreter_builder.set_grid_dim(*grid)
        errors = []

        def program(x, y, z):
            try:
                interpreter.interpreter_builder.set_grid_idx(x, y, z)
                self.fn(**args)
            except BaseException as exc:  # noqa: BLE001 - reported to the launching thread
                errors.append(exc)

        threads = [threading.Thread(target=program, args=(x, y, z), daemon=True)
                   for x in range(grid[0]) for y in range(grid[1]) for z in range(grid[2])]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + TIMEOUT_S
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        if any(thread.is_alive() for thread in threads):
            _aborted.set()  # the stuck programs raise at their next atomic
            for thread in threads:
                thread.join()
            raise ProgramsStuck(f"programs still running after {TIMEOUT_S} s: a barrier never opened")
        if errors:
            raise errors[0]
    finally:
        patch_scope.restore()
    self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)


_aborted = threading.Event()  # set when a launch is stuck: every program then stops


def _sleepy_atomic_rmw(original):
    def atomic_rmw(self, *args, **kwargs):
        if _aborted.is_set():
            raise ProgramsStuck("aborted")
        time.sleep(_schedule.uniform(0.0, MAX_SLEEP_S))
        return original(self, *args, **kwargs)
    return atomic_rmw


@contextlib.contextmanager
def concurrent_programs(seed: int = 0, capacity: int = CONCURRENT_CAPACITY):
    """Inside, interpreted launches run every program at once (and the persistent launcher is told
    that `capacity` programs are resident: all of them, unless a test wants fewer); each atomic
    sleeps up to MAX_SLEEP_S first."""
    builder_cls = type(interpreter.interpreter_builder)
    local = threading.local()
    saved = (interpreter.GridExecutor.__call__, builder_cls.create_atomic_rmw, occupancy.INTERPRETED_RESIDENT_PROGRAMS)
    _schedule.seed(seed)
    _aborted.clear()
    interpreter.GridExecutor.__call__ = _concurrent_call
    builder_cls.grid_idx = property(lambda self: getattr(local, "grid_idx", None),
                                    lambda self, value: setattr(local, "grid_idx", value))
    builder_cls.create_atomic_rmw = _sleepy_atomic_rmw(saved[1])
    occupancy.INTERPRETED_RESIDENT_PROGRAMS = capacity
    try:
        yield
    finally:
        interpreter.GridExecutor.__call__, builder_cls.create_atomic_rmw = saved[:2]
        occupancy.INTERPRETED_RESIDENT_PROGRAMS = saved[2]
        del builder_cls.grid_idx
        interpreter.interpreter_builder.__dict__.pop("grid_idx", None)
        _aborted.clear()
