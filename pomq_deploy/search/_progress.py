"""A search phase's step per measured plan, with the last plan's numbers beside the bar."""

from collections.abc import Callable

from optuna.trial import FrozenTrial

from ..progress import Step


def trial_step(step: Step) -> Callable[[FrozenTrial], None]:
    """``on_trial`` for ``measure_plans`` / ``run_trials``: one step of the phase per completed trial."""
    feasible = [0]

    def on_trial(trial: FrozenTrial) -> None:
        feasible[0] += bool(trial.user_attrs.get("feasible"))
        step(info=f"last: top-1 {trial.values[0]:.3f}, {trial.values[1]:.1f} ms; {feasible[0]} feasible in this process")

    return on_trial
