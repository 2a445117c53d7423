"""The application shell: command line, session, logging, runner, manifests, run report."""
