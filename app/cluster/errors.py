"""Errors of the local cluster launcher.

ClusterError                 one-line reason shown to the operator
 +-- AlreadyRunning          ``up`` on a state dir whose cluster runs
 +-- ComponentFailed         a component could not start or become healthy
"""


class ClusterError(Exception):
    """A failure the CLI reports as one line, without a traceback."""


class AlreadyRunning(ClusterError):
    pass


class ComponentFailed(ClusterError):
    pass
