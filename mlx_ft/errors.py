"""One exception tree for everything mlxft reports to a user.

Only the CLI turns these into exit codes: ``UserError`` subclasses (bad input the user can fix)
exit 2, everything else rooted in ``MlxftError`` exits 1. Messages name the file, the key or line,
and the fix, because they are the whole user interface of a failure.
"""

from __future__ import annotations


class MlxftError(Exception):
    """Base of every error mlxft raises on purpose."""

    exit_code = 1


class UserError(MlxftError):
    """Bad input: a file, flag or key the user can fix. Exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config or suite file is invalid. Carries every problem found, not just the first."""

    def __init__(self, path: object, problems: list[str] | str):
        self.path = str(path)
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.path}: {len(self.problems)} problem(s):\n{lines}")


class DataError(ConfigError):
    """Training data is invalid (schema, roles, empty turns, too long)."""


class ModelError(UserError):
    """A model path is missing, unsupported or does not load strictly."""


class OutputExistsError(UserError):
    """Refusing to overwrite something already on disk."""


class TrainingError(MlxftError):
    """Training diverged, learned nothing, or could not start."""


class ServerError(MlxftError):
    """The evaluation server failed to start, died, or answered with an error."""


class PortInUseError(ServerError, UserError):
    """The requested port is already held by some other process."""

    exit_code = 2


class WrongModelError(ServerError):
    """The server answering is not provably serving the model we meant."""


class EvalError(UserError):
    """Evaluation results are missing or inconsistent (fixable by running the eval)."""


class CorruptFileError(MlxftError):
    """A JSON file mlxft reads is not valid JSON (cut short by a crash, or edited by hand)."""


class SpreadError(MlxftError):
    """One or more jobs spread over hosts failed (each one's host and last output are in the message)."""


class EarlyStopped(MlxftError):
    """Not a failure: raised from the training callback to end mlx-lm's loop when the in-loop eval
    stops improving (train.py catches it and records why)."""

    exit_code = 0
