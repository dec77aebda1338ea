"""The lessons' exercise checks, kept out of the notebooks so that no answer shows there.

Each lesson imports its own module, `from minqlora.exercises import lesson01 as check`, and calls
`check.exercise_1(answer_1)`, one function per exercise. A check recomputes what it needs with the
library (the answer key), prints a verdict with a hint per mistake (never the answer), and returns
True only when the answer is right. Nothing here is imported by `import minqlora`.
"""
