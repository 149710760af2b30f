"""`tunesmith ui`: a local web studio over the run directories the CLI writes (tunesmith[ui]: FastAPI, uvicorn).

    sandbox.py     the only folders it may touch: --runs and the project's configs/ (traversal, links out refused)
    runs.py        a run directory read as it is being written: status, steps, losses, curves, reports
    metrics.py     metrics.jsonl read incrementally, tolerating a half-written last line or a damaged one
    jobs.py        commands started as ordinary `python -m tunesmith ...` processes, recorded in the run dir
    launch.py      what may be started, checked with the CLI's own config checks before anything runs
    playground.py  chat with a run's model through tunesmith.serve (the same generation and stop tokens)
    preview.py     prepared rows as the model sees them, loss-bearing tokens marked
    app.py         the FastAPI routes and the guard (token, host and origin checks)
    command.py     the `tunesmith ui` command: bind, safety defaults, serve
    static/        the page: hand-written HTML, CSS and JavaScript, curves drawn as inline SVG (nothing from a CDN)

Nothing imports this package except tunesmith.cli.
"""
