"""The command-line surface of the commands whose work needs torch (train, eval, plot): argument
declarations and a ``run`` that imports the engine only once the arguments and the config are read,
so that ``megdet --help`` and a config error answer at once. ``megdet.cli`` lists every command."""
