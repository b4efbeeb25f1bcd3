"""``predicted(what, prediction, measured)``: an open exercise's verdict, the learner's prediction
beside the measurement."""

from __future__ import annotations


def predicted(what: str, prediction, measured, tolerance: float = 0.1) -> bool:
    """An open exercise's verdict: the learner's prediction beside the measurement.

    ``prediction`` is None until the learner writes one (the learner notebooks' stub), which gets a
    message, not a traceback. Numbers count as right within ``tolerance`` (relative); anything
    else must be equal. Prints one line and returns whether the prediction held.

        prediction = None  # the learner's guess, written before running the measurement
        exercises.predicted("trainable parameters of LoRA r=16", prediction, measured)
    """
    if prediction is None:
        print(f"✗ {what}: no prediction yet. Write yours in the cell above (replace None), run it, then "
              "run this cell.")
        return False
    if isinstance(measured, (int, float)) and not isinstance(measured, bool):
        try:
            guess = float(prediction)
        except (TypeError, ValueError):
            print(f"✗ {what}: expected a number as the prediction, got {prediction!r}.")
            return False
        off = (guess - measured) / measured if measured else guess - measured
        ok = abs(off) <= tolerance
        print(f"{'✓' if ok else '✗'} {what}: you predicted {_num(guess)}, measured {_num(measured)} "
              f"({off:+.1%}{'' if ok else f', more than {tolerance:.0%} off: look at what you left out'})")
        return ok
    ok = prediction == measured
    print(f"{'✓' if ok else '✗'} {what}: you predicted {prediction!r}, measured {measured!r}")
    return ok


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 and float(x).is_integer() else f"{x:,.4g}"


__all__ = ["predicted"]
