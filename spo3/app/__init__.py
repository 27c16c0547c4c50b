"""The app layer: entry points (CLI, single-machine launcher, run report, warm start, model creation)
and the wiring of policy engines and publishers. The only code that imports spo3/actors/ and spo3/learner/."""
