"""Reference answers to the graded exercises: `minillm grade --impl solutions` scores full
marks."""
