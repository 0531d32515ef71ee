"""The local broker's environment (devstack/broker.py): pure logic, no broker started."""

from posemesh.devstack.broker import TOKIO_WORKER_THREADS, broker_env


def test_the_broker_gets_its_runtime_threads_unless_the_operator_set_them():
    assert broker_env({"PATH": "/bin"}) == {"PATH": "/bin", "TOKIO_WORKER_THREADS": str(TOKIO_WORKER_THREADS)}
    assert broker_env({"PATH": "/bin", "TOKIO_WORKER_THREADS": "2"})["TOKIO_WORKER_THREADS"] == "2"
    assert broker_env({"TOKIO_WORKER_THREADS": ""})["TOKIO_WORKER_THREADS"] == str(TOKIO_WORKER_THREADS)
