"""What a learner's answer calls while it runs, to refuse one that skips the exercise's idea:
peftlab's own code, a torch function the exercise excludes, a dense ΔW or a large SVD."""

from __future__ import annotations

import sys

from torch import Tensor
from torch.overrides import TorchFunctionMode

from peftlab.exercises.exercise import Exercise

_SVD_OPS = frozenset({"svd", "svdvals", "svd_lowrank", "pca_lowrank", "eig", "eigh", "eigvals", "eigvalsh"})


class Watch(TorchFunctionMode):
    """While the answer runs: every torch call (``TorchFunctionMode``) and every Python call
    (``sys.setprofile``), to catch what the exercise's idea excludes. The first problem is kept."""

    def __init__(self, exercise: Exercise, inputs: dict) -> None:
        super().__init__()
        self.exercise, self.problem = exercise, None
        self.dense = exercise.dense(inputs) if exercise.dense else None
        self._allowed = {id(getattr(v, "__code__", None)) for v in inputs.values() if callable(v)}
        self._inside_allowed = 0
        self._previous_profile = None

    def __enter__(self):
        self._previous_profile = sys.getprofile()
        sys.setprofile(self._profile)
        return super().__enter__()

    def __exit__(self, *exc):
        sys.setprofile(self._previous_profile)
        return super().__exit__(*exc)

    def _profile(self, frame, event, arg) -> None:
        # an input callable (LoftQ's `quantize`) may run peftlab code; the answer itself may not
        if id(frame.f_code) in self._allowed:
            self._inside_allowed += {"call": 1, "return": -1}.get(event, 0)
            return
        if event != "call" or self._inside_allowed or self.problem or frame.f_code in _OWN_CODE:
            return
        module = str(frame.f_globals.get("__name__", ""))
        caller = str(frame.f_back.f_globals.get("__name__", "")) if frame.f_back else ""
        if module.split(".")[0] == "peftlab" and caller.split(".")[0] != "peftlab":
            self.problem = (f"your function calls peftlab's {_public_module(module, frame.f_code)}."
                            f"{frame.f_code.co_name}; the exercise is to write it yourself")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.problem is None and not self._inside_allowed:
            self.problem = self._inspect(getattr(func, "__name__", ""), args, out)
        return out

    def _inspect(self, op: str, args, out) -> str | None:
        if op in self.exercise.forbid_ops:
            return f"your function uses torch's {op}, which this exercise asks you to build yourself"
        if self.dense is None:
            return None
        d_out, d_in, r = self.dense
        big = {(d_out, d_in), (d_in, d_out)}
        tensors = [a for a in _flat(args) if isinstance(a, Tensor)]
        if op in _SVD_OPS and any(t.dim() >= 2 and min(t.shape[-2:]) > r for t in tensors):
            return (f"your function takes the {op} of a {'x'.join(map(str, tensors[0].shape))} matrix; the "
                    f"point is that an {r} x {r} one is enough")
        if (isinstance(out, Tensor) and out.dim() >= 2 and tuple(out.shape[-2:]) in big
                and not any(t.dim() >= 2 and tuple(t.shape[-2:]) in big for t in tensors)):
            return (f"your function builds a {d_out} x {d_in} matrix from the factors (that is ΔW); the "
                    "point is never to form it")
        return None


_OWN_CODE = frozenset(f.__code__ for f in (Watch.__torch_function__, Watch._inspect, Watch.__exit__))


def _public_module(module: str, code) -> str:
    """The module a learner reaches the function of ``code`` through: the shortest package above
    ``module`` that re-exports it (``peftlab.spectra``, not ``peftlab.spectra.svd``), and
    ``peftlab.exercises`` for a lesson's own reference (found in ``EXERCISES``). Only modules
    already imported are looked at, and never the lazy facade ``peftlab`` itself."""
    if module.startswith("peftlab.exercises."):
        return "peftlab.exercises"
    parts = module.split(".")
    for end in range(2, len(parts)):
        package = sys.modules.get(".".join(parts[:end]))
        found = getattr(package, "__dict__", {}).get(code.co_name)  # no module __getattr__ runs
        if getattr(found, "__code__", None) is code:
            return ".".join(parts[:end])
    return module


def _flat(items) -> list:
    """Nested lists and tuples, flattened (a torch call's arguments)."""
    out = []
    for item in items:
        out.extend(_flat(item) if isinstance(item, (list, tuple)) else [item])
    return out


__all__ = ["Watch"]
