"""The app layer: entry points (CLI, single-machine launcher, benchmark, report, model creation)
and the wiring of policy engines and publishers. The only code that imports spo3/actors/ and spo3/learner/."""
