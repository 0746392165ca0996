"""Your answers to the graded exercises: fill in each function, then run `minillm grade chNN`."""
