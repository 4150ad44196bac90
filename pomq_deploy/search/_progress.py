"""A progress bar over completed trials, drawn on stderr when it is a terminal."""

from contextlib import contextmanager

from optuna.trial import TrialState
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def trial_progress(console, study, total: int):
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    columns = (TextColumn("search"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("search", total=total, completed=min(done, total), info="")
        feasible = [0]

        def on_trial(trial) -> None:
            feasible[0] += bool(trial.user_attrs.get("feasible"))
            done = min(total, len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))))
            info = f"last: top-1 {trial.values[0]:.3f}, {trial.values[1]:.1f} ms; {feasible[0]} feasible in this process"
            progress.update(task, completed=done, info=info)
            if not console.is_terminal and (done % 10 == 0 or done == total):  # a log file still sees progress
                console.print(f"search: {done}/{total} plans; {info}")

        yield on_trial
