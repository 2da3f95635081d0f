#!/usr/bin/env python3
"""Eclipse paho-mqtt 2.x against a running Bulwark broker (MQTT 3.1.1).

Runs one scenario over TLS ("tcp" transport) or secure WebSocket ("websockets"), prints
exactly one JSON line with the result on stdout and exits 0 only on success.

Scenarios:
  connect            connect and disconnect (the caller may expect a failure)
  qos                QoS 0/1/2 round trip to a QoS 2 and a QoS 1 subscriber
  retained           retained set / replace / clear (QoS 0, 1, 2)
  will               a will is published when the socket is closed abruptly, not after
                     DISCONNECT; the retained will is kept
  persistent-setup   clean_session=False, subscribe PREFIX/#, DISCONNECT
  publish            publish --count messages PREFIX/<i> = m<i> (QoS 1, the last QoS 2)
  persistent-check   clean_session=False again: session present, the --count queued
                     messages in order, and the subscription still in effect

Example:
  interop.py --port 8883 --ca ca.pem --cert c.pem --key c.key --client-id x \
      --prefix t/1 qos
"""

import argparse
import json
import queue
import signal
import socket
import sys
import threading
import time
import traceback

import paho.mqtt.client as mqtt

ARGS = None
RESULT = {}


class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)


def make_client(client_id, clean_session=True):
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session,
        transport=ARGS.transport,
        protocol=mqtt.MQTTv311,
    )
    c.tls_set(ca_certs=ARGS.ca, certfile=ARGS.cert, keyfile=ARGS.key)
    if ARGS.transport == "websockets":
        c.ws_set_options(path=ARGS.ws_path)
    return c


class Peer:
    """A paho client with a network thread, whose events are turned into waits."""

    def __init__(self, client_id, clean_session=True, will=None):
        self.id = client_id
        self.c = make_client(client_id, clean_session)
        if will:
            self.c.will_set(*will)
        self.messages = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.session_present = None
        self.connack = None
        self.subacks = {}
        self.suback_cv = threading.Condition()
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_disconnect = self._on_disconnect

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = reason_code
        self.session_present = bool(flags.session_present)
        self.connected.set()

    def _on_message(self, client, userdata, msg):
        self.messages.put((msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties):
        with self.suback_cv:
            self.subacks[mid] = [rc.value for rc in reason_code_list]
            self.suback_cv.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnected.set()

    def connect(self):
        self.c.connect(ARGS.host, ARGS.port, keepalive=30)
        self.c.loop_start()
        deadline = time.monotonic() + ARGS.step_timeout
        while not self.connected.is_set():
            check(not self.disconnected.is_set(), f"{self.id}: connection closed before CONNACK")
            check(time.monotonic() < deadline, f"{self.id}: no CONNACK")
            self.connected.wait(0.05)
        check(not self.connack.is_failure, f"{self.id}: CONNACK refused: {self.connack}")
        return self

    def subscribe(self, topics):
        """topics: [(filter, qos)]; waits for the SUBACK and checks the granted QoS."""
        rc, mid = self.c.subscribe(topics)
        check(rc == mqtt.MQTT_ERR_SUCCESS, f"{self.id}: subscribe error {rc}")
        with self.suback_cv:
            ok = self.suback_cv.wait_for(lambda: mid in self.subacks, ARGS.step_timeout)
        check(ok, f"{self.id}: no SUBACK for {topics}")
        granted = self.subacks[mid]
        check(granted == [q for _, q in topics], f"{self.id}: granted {granted} for {topics}")

    def publish(self, topic, payload, qos, retain=False):
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        check(info.rc == mqtt.MQTT_ERR_SUCCESS, f"{self.id}: publish error {info.rc}")
        info.wait_for_publish(ARGS.step_timeout)
        check(info.is_published(), f"{self.id}: {topic} at QoS {qos} not acknowledged")

    def next_message(self, what):
        try:
            return self.messages.get(timeout=ARGS.step_timeout)
        except queue.Empty:
            raise Failure(f"{self.id}: no message ({what})") from None

    def expect(self, want, what):
        got = self.next_message(what)
        check(got == want, f"{self.id}: {what}: got {fmt(got)}, want {fmt(want)}")

    def disconnect(self):
        self.c.disconnect()
        self.disconnected.wait(ARGS.step_timeout)
        self.c.loop_stop()


def fmt(m):
    topic, payload, qos, retain = m
    return f"(topic={topic!r}, payload={payload!r}, qos={qos}, retain={retain})"


def p(suffix):
    return f"{ARGS.prefix}/{suffix}"


def scenario_connect():
    Peer(ARGS.client_id).connect().disconnect()


def scenario_qos():
    s2 = Peer(f"{ARGS.client_id}-sub2").connect()
    s2.subscribe([(p("#"), 2)])
    s1 = Peer(f"{ARGS.client_id}-sub1").connect()
    s1.subscribe([(p("#"), 1)])
    pub = Peer(f"{ARGS.client_id}-pub").connect()
    for qos in (0, 1, 2):
        # Binary payload: a NUL, a byte that is not UTF-8, and text.
        payload = b"\x00\xff" + f"q{qos}".encode()
        pub.publish(p(f"q{qos}"), payload, qos)
        s2.expect((p(f"q{qos}"), payload, qos, False), f"QoS {qos} at subscription QoS 2")
        s1.expect(
            (p(f"q{qos}"), payload, min(qos, 1), False), f"QoS {qos} at subscription QoS 1"
        )
    big = bytes(range(256)) * 800  # 200 kB
    pub.publish(p("big"), big, 2)
    s2.expect((p("big"), big, 2, False), "200 kB payload at QoS 2")
    s1.expect((p("big"), big, 1, False), "200 kB payload at QoS 1")
    for s in (s1, s2):
        check(s.messages.empty(), f"{s.id}: unexpected extra message")
    RESULT["delivered"] = 8
    for c in (pub, s1, s2):
        c.disconnect()


def scenario_retained():
    pub = Peer(f"{ARGS.client_id}-pub").connect()
    pub.publish(p("a"), b"one", 1, retain=True)
    pub.publish(p("a"), b"two", 2, retain=True)
    pub.publish(p("b"), b"bee", 1, retain=True)
    pub.publish(p("c"), b"zero", 0, retain=True)
    # QoS 0 is not acknowledged; a later acknowledged publish on the same connection
    # orders it.
    pub.publish(p("sync"), b"", 1)

    s1 = Peer(f"{ARGS.client_id}-r1").connect()
    s1.subscribe([(p("+"), 1)])
    got = sorted(s1.next_message("retained on subscribe") for _ in range(3))
    want = [
        (p("a"), b"two", 1, True),
        (p("b"), b"bee", 1, True),
        (p("c"), b"zero", 0, True),
    ]
    check(got == want, f"retained on subscribe: got {got}, want {want}")

    # Live publishes are delivered with retain = 0, including the clearing one.
    pub.publish(p("a"), b"three", 1, retain=True)
    s1.expect((p("a"), b"three", 1, False), "live retained publish")
    pub.publish(p("a"), b"", 1, retain=True)
    s1.expect((p("a"), b"", 1, False), "clearing publish")
    s1.disconnect()

    # A new subscriber to a and b gets only b's retained message; a later live message
    # to a proves nothing retained for a was pending (one connection delivers in order).
    s2 = Peer(f"{ARGS.client_id}-r2").connect()
    s2.subscribe([(p("a"), 1), (p("b"), 1)])
    s2.expect((p("b"), b"bee", 1, True), "retained b after a was cleared")
    pub.publish(p("a"), b"live", 1)
    s2.expect((p("a"), b"live", 1, False), "cleared retained message must not be delivered")
    for c in (pub, s2):
        c.disconnect()


def scenario_will():
    watcher = Peer(f"{ARGS.client_id}-watch").connect()
    watcher.subscribe([(p("status/#"), 1)])

    # DISCONNECT: the will is discarded.
    polite = Peer(
        f"{ARGS.client_id}-polite", will=(p("status/polite"), b"gone", 1, False)
    ).connect()
    polite.disconnect()

    # Socket closed without DISCONNECT (no MQTT, TLS or WebSocket close): will published.
    # No network thread, so paho does not reconnect behind our back.
    crashy = make_client(f"{ARGS.client_id}-crashy")
    crashy.will_set(p("status/crashy"), b"offline", qos=1, retain=True)
    connacks = []
    crashy.on_connect = lambda c, u, f, rc, pr: connacks.append(rc)
    crashy.connect(ARGS.host, ARGS.port, keepalive=30)
    deadline = time.monotonic() + ARGS.step_timeout
    while not connacks:
        check(time.monotonic() < deadline, "crashy: no CONNACK")
        rc = crashy.loop(timeout=0.05)
        check(rc == mqtt.MQTT_ERR_SUCCESS, f"crashy: loop error {rc}")
    check(not connacks[0].is_failure, f"crashy: refused {connacks[0]}")
    sock = crashy.socket()
    raw = getattr(sock, "_socket", sock)  # the TLS socket under paho's WebSocket wrapper
    raw.shutdown(socket.SHUT_RDWR)  # SSLSocket.shutdown: FIN, no close_notify
    raw.close()

    watcher.expect((p("status/crashy"), b"offline", 1, False), "will of the dropped client")
    late = Peer(f"{ARGS.client_id}-late").connect()
    late.subscribe([(p("status/#"), 1)])
    late.expect((p("status/crashy"), b"offline", 1, True), "retained will")
    # Anything pending for the watcher (a wrongly published polite will) precedes this.
    late.publish(p("status/end"), b"end", 1)
    watcher.expect((p("status/end"), b"end", 1, False), "only the dropped client's will")
    for c in (watcher, late):
        c.disconnect()


def scenario_persistent_setup():
    s = Peer(ARGS.client_id, clean_session=False).connect()
    RESULT["session_present"] = s.session_present
    s.subscribe([(p("#"), 1)])
    s.disconnect()


def scenario_publish():
    # Another client id: the session of --client-id must stay offline.
    pub = Peer(f"{ARGS.client_id}-pub").connect()
    for i in range(ARGS.count):
        pub.publish(p(str(i)), f"m{i}".encode(), 2 if i == ARGS.count - 1 else 1)
    pub.disconnect()


def scenario_persistent_check():
    s = Peer(ARGS.client_id, clean_session=False).connect()
    RESULT["session_present"] = s.session_present
    check(s.session_present, "CONNACK session present = 0; the session was lost")
    for i in range(ARGS.count):
        s.expect((p(str(i)), f"m{i}".encode(), 1, False), f"queued message {i}")
    # The subscription survived: a live message arrives without subscribing again.
    pub = Peer(f"{ARGS.client_id}-live").connect()
    pub.publish(p("after"), b"live", 2)
    s.expect((p("after"), b"live", 1, False), "live message to the restored subscription")
    check(s.messages.empty(), "unexpected extra message")
    for c in (pub, s):
        c.disconnect()


SCENARIOS = {
    "connect": scenario_connect,
    "qos": scenario_qos,
    "retained": scenario_retained,
    "will": scenario_will,
    "persistent-setup": scenario_persistent_setup,
    "publish": scenario_publish,
    "persistent-check": scenario_persistent_check,
}


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--host", default="localhost")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--transport", choices=["tcp", "websockets"], default="tcp")
    ap.add_argument("--ws-path", default="/mqtt")
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--client-id", required=True)
    ap.add_argument("--prefix", required=True, help="topic prefix")
    ap.add_argument("--count", type=int, default=5)
    ap.add_argument("--step-timeout", type=float, default=10.0)
    ap.add_argument("--timeout", type=int, default=25, help="whole scenario, seconds")
    ARGS = ap.parse_args()
    RESULT.update(scenario=ARGS.scenario, transport=ARGS.transport, ok=False)

    def on_alarm(signum, frame):
        raise Failure(f"scenario did not finish within {ARGS.timeout} s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(ARGS.timeout)
    try:
        SCENARIOS[ARGS.scenario]()
        RESULT["ok"] = True
    except Failure as e:
        RESULT["error"] = str(e)
    except Exception as e:  # noqa: BLE001 - any client error is a failed scenario
        RESULT["error"] = f"{type(e).__name__}: {e}"
        RESULT["traceback"] = traceback.format_exc()
    signal.alarm(0)
    print(json.dumps(RESULT), flush=True)
    return 0 if RESULT["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
