"""The workflows: one module per verb (training run, evaluate, recalibrate, summarize), the one
report pipeline they share, and the rebuilding of the datasets a checkpoint was trained on. Above
evaluation/ (statistics over arrays) and training/ (Lightning parts); below the entry points."""
