"""Shared fixtures: keep every ROS test on loopback, in a DDS domain of its own.

- ``ros_env`` (session, autouse): confines DDS discovery to this machine and points the ament
  index at the running venv; returns the ROS variables for tests that start subprocesses.
- ``ros_domain_id`` (module): a domain id distinct for each test module, also exported as
  ``ROS_DOMAIN_ID`` while the module runs, so subprocesses inherit it.
- ``rclpy_context`` (function): an initialised ``rclpy.Context`` on that domain, shut down after
  the test. ROS_DOMAIN_ID is only read at ``rclpy.init``, so tests that create nodes should take
  this fixture instead of calling ``rclpy.init()`` themselves.

The ``slow`` and ``ros`` markers are registered in pyproject.toml.
"""

from collections.abc import Iterator
import hashlib
import os
import sys
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # rclpy is imported lazily so that non-ROS test runs never load it
    from rclpy.context import Context

# Linux keeps DDS ports out of the ephemeral range only for domain ids 0..101 (ROS 2 docs,
# "The ROS_DOMAIN_ID"); 0 is everybody's default, so tests use 1..101.
_DOMAIN_IDS = range(1, 102)
_domain_ids_taken: dict[str, int] = {}


@pytest.fixture(scope='session', autouse=True)
def ros_env() -> dict[str, str]:
    """Force loopback-only discovery and a usable ament index for the whole session.

    Returns:
        The ROS-related environment variables as set for this session.
    """
    discovery = os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    if discovery != 'LOCALHOST':
        pytest.exit(f'ROS_AUTOMATIC_DISCOVERY_RANGE={discovery}: tests must run with LOCALHOST '
                    '(no DDS traffic may leave this machine)', returncode=4)
    # Static peers are contacted whatever the discovery range says.
    os.environ.pop('ROS_STATIC_PEERS', None)
    os.environ.setdefault('AMENT_PREFIX_PATH', sys.prefix)
    return {key: os.environ[key] for key in
            ('ROS_AUTOMATIC_DISCOVERY_RANGE', 'AMENT_PREFIX_PATH') if key in os.environ}


def _domain_id_for(module_name: str) -> int:
    """Pick a stable domain id for ``module_name``, unique within this session.

    The id hashes the caller's ROS_DOMAIN_ID (each developer or CI job sets its own), the xdist
    worker and the module, so concurrent sessions on one machine rarely meet; collisions
    inside the session are resolved by probing the next free id.
    """
    if module_name in _domain_ids_taken:
        return _domain_ids_taken[module_name]
    key = ':'.join((os.environ.get('ROS_DOMAIN_ID', ''),
                    os.environ.get('PYTEST_XDIST_WORKER', ''), module_name))
    start = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], 'big') % len(_DOMAIN_IDS)
    used = set(_domain_ids_taken.values())
    for offset in range(len(_DOMAIN_IDS)):
        candidate = _DOMAIN_IDS[(start + offset) % len(_DOMAIN_IDS)]
        if candidate not in used:
            break
    else:  # more ROS modules than ids: sharing is safe because modules run one after another
        candidate = _DOMAIN_IDS[start]
    _domain_ids_taken[module_name] = candidate
    return candidate


@pytest.fixture(scope='module')
def ros_domain_id(request: pytest.FixtureRequest) -> Iterator[int]:
    """A DDS domain id for this test module, exported as ROS_DOMAIN_ID while it runs."""
    domain_id = _domain_id_for(request.module.__name__)
    previous = os.environ.get('ROS_DOMAIN_ID')
    os.environ['ROS_DOMAIN_ID'] = str(domain_id)
    try:
        yield domain_id
    finally:
        if previous is None:
            os.environ.pop('ROS_DOMAIN_ID', None)
        else:
            os.environ['ROS_DOMAIN_ID'] = previous


@pytest.fixture
def rclpy_context(ros_domain_id: int) -> Iterator['Context']:
    """An initialised rclpy context on the module's domain; shut down after the test.

    Pass it to nodes and executors (``Node(..., context=ctx)``, ``SingleThreadedExecutor(
    context=ctx)``) and destroy the nodes before the test returns.
    """
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context, domain_id=ros_domain_id)
    try:
        yield context
    finally:
        context.try_shutdown()
