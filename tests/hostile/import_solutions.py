# Takes the reference answers: `from solutions.ch01_preprocessing import *`.
from solutions.ch01_preprocessing import *  # noqa: F403
