"""Unit tests of the pure parts of scripts/bench.py: python3 -m unittest scripts/test_bench.py"""

import os
import sys
import unittest
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402


class Median(unittest.TestCase):
    def test_odd_even_and_missing(self):
        self.assertEqual(bench.median([3, 1, 2]), 2)
        self.assertEqual(bench.median([4, 1, 3, 2]), 2.5)
        self.assertEqual(bench.median([None, 5, None]), 5)
        self.assertIsNone(bench.median([]))
        self.assertIsNone(bench.median([None, float("nan")]))


class Ratios(unittest.TestCase):
    def test_ratio(self):
        self.assertAlmostEqual(bench.ratio(150, 100), 1.5)
        self.assertIsNone(bench.ratio(None, 100))
        self.assertIsNone(bench.ratio(100, None))
        self.assertIsNone(bench.ratio(100, 0))

    def test_normalised_turns_lower_is_better(self):
        self.assertAlmostEqual(bench.normalised(2.0, True), 2.0)
        self.assertAlmostEqual(bench.normalised(2.0, False), 0.5)
        self.assertIsNone(bench.normalised(None, True))
        self.assertIsNone(bench.normalised(0.0, False))

    def test_row_ratio_references(self):
        thr = bench.Row("fan-in-qos0", "msgs_per_s", "msgs/s", True, ("best", ">=", 1.0))
        lat = bench.Row("latency-qos0", "p50_us", "p50", False, ("mosquitto", "<=", 1.0))
        peers = {"mosquitto": 100.0, "rumqttd": 200.0}
        self.assertAlmostEqual(bench.row_ratio(thr, 300.0, peers), 1.5)  # vs best peer
        self.assertAlmostEqual(bench.row_ratio(lat, 50.0, peers), 0.5)  # vs mosquitto

    def test_verdict(self):
        peers = {"mosquitto": 100.0, "rumqttd": 200.0}
        self.assertEqual(bench.verdict(200.0, peers, ("best", ">=", 1.0)), "PASS")
        self.assertEqual(bench.verdict(199.0, peers, ("best", ">=", 1.0)), "FAIL")
        self.assertEqual(bench.verdict(150.0, peers, ("mosquitto", "<=", 1.5)), "PASS")
        self.assertEqual(bench.verdict(151.0, peers, ("mosquitto", "<=", 1.5)), "FAIL")
        self.assertEqual(bench.verdict(None, peers, ("mosquitto", "<=", 1.0)), "n/a")
        self.assertEqual(bench.verdict(1.0, {"rumqttd": 1.0}, ("mosquitto", "<=", 1.0)), "n/a")
        self.assertEqual(bench.verdict(1.0, peers, None), "—")

    def test_reference_peer(self):
        peers = {"mosquitto": 100.0, "rumqttd": 200.0}
        self.assertEqual(bench.reference_peer(peers, ("best", ">=", 1.0)), "rumqttd")
        self.assertEqual(bench.reference_peer(peers, ("best", "<=", 1.0)), "mosquitto")
        self.assertEqual(bench.reference_peer(peers, ("mosquitto", "<=", 1.5)), "mosquitto")
        self.assertIsNone(bench.reference_peer({"rumqttd": 1.0}, ("mosquitto", "<=", 1.0)))
        self.assertIsNone(bench.reference_peer({"rumqttd": None}, ("best", ">=", 1.0)))
        self.assertIsNone(bench.reference_peer(peers, None))

    def test_ranges_overlap(self):
        self.assertTrue(bench.ranges_overlap((1, 3), (3, 5)))
        self.assertTrue(bench.ranges_overlap((2, 9), (3, 5)))
        self.assertFalse(bench.ranges_overlap((1, 2), (3, 5)))
        self.assertFalse(bench.ranges_overlap((6, 7), (3, 5)))
        self.assertIsNone(bench.ranges_overlap(None, (3, 5)))


class Helpers(unittest.TestCase):
    def test_rotated(self):
        self.assertEqual(bench.rotated([1, 2, 3], 1), [2, 3, 1])
        self.assertEqual(bench.rotated([1, 2, 3], 4), [2, 3, 1])
        self.assertEqual(bench.rotated([], 2), [])

    def test_run_plan_gives_latency_extra_pinned_rounds(self):
        fan = bench.Scenario("fan-in-qos0", "fan-in", False, [])
        lat = bench.Scenario("latency-qos0", "latency", False, [])
        plan = bench.run_plan([fan, lat], ["a", "b"], 3, 7, 1)
        runs = lambda name, pinned: [(r, b) for p, r, sc, b in plan if sc.name == name and p == pinned]
        self.assertEqual([r for r, _ in runs("fan-in-qos0", True)], [0, 0, 1, 1, 2, 2])
        self.assertEqual(sorted({r for r, _ in runs("latency-qos0", True)}), list(range(7)))
        self.assertEqual(len(runs("latency-qos0", True)), 14)
        self.assertEqual(len(runs("fan-in-qos0", False)), 2)
        self.assertEqual(len(runs("latency-qos0", False)), 2)
        # The brokers' order turns every round; the pinned passes come first.
        self.assertEqual(runs("latency-qos0", True)[:4], [(0, "a"), (0, "b"), (1, "b"), (1, "a")])
        self.assertTrue(all(p for p, *_ in plan[:20]) and not any(p for p, *_ in plan[20:]))
        # Without a latency scenario, or with fewer latency rounds asked: the common count.
        self.assertEqual(len(bench.run_plan([fan], ["a"], 3, 7, 0)), 3)
        self.assertEqual(len(bench.run_plan([lat], ["a"], 3, 1, 0)), 3)

    def test_scaled(self):
        self.assertEqual(bench.scaled(200000, 0.1), 20000)
        self.assertEqual(bench.scaled(50, 0.01, 2), 2)

    def test_selected(self):
        self.assertTrue(bench.selected("fan-in-qos0", []))
        self.assertTrue(bench.selected("fan-in-qos0", ["fan-in"]))
        self.assertTrue(bench.selected("retained", ["retained"]))
        self.assertFalse(bench.selected("fan-out-qos0", ["fan-in"]))
        self.assertTrue(bench.selected("fan-out-qos1", ["fan"]))
        self.assertFalse(bench.selected("fan-in-qos0", ["fan-i"]))

    def test_is_figure_line(self):
        self.assertTrue(bench.is_figure_line('{"scenario":"agent-ingest","records_per_s":1.0}'))
        self.assertTrue(bench.is_figure_line('{"agent_cpu_percent":59.3,"scenario":"agent-ingest"}'))
        self.assertFalse(bench.is_figure_line('{"records_per_s":1.0}'))
        self.assertFalse(bench.is_figure_line('test foo ... ok'))
        self.assertFalse(bench.is_figure_line('{not json'))

    def test_parse_listen_ports(self):
        text = (
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
            "   0: 0100007F:075B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n"
            "   1: 0100007F:C350 0100007F:075B 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n"
        )
        self.assertEqual(bench.parse_listen_ports(text), {1883})

    def test_render_template(self):
        self.assertEqual(bench.render_template("a=@A@ b=@B_2@", {"A": 1, "B_2": "x"}), "a=1 b=x")
        with self.assertRaises(bench.BenchError):
            bench.render_template("@MISSING@", {})

    def test_committed_configs_have_every_placeholder(self):
        values = dict(bench.SHARED_LIMITS, TCP_PORT=1, TLS_PORT=2, CERTS="/c", DATA="/d", ACL="/a",
                      CONF_DIR="/b", USER="u", LOG_BASE="/l/x", ROUTER_MAX_CONNECTIONS=1, MAX_OUTGOING=1, DURABILITY="sync")
        for name in ("bulwark.toml", "mosquitto.conf", "rumqttd.toml"):
            text = (bench.BENCH_DIR / name).read_text()
            out = bench.render_template(text, values)
            self.assertNotRegex(out, r"@[A-Z_]+@", name)


def fake_results():
    out = []
    for rnd in (1, 2, 3):
        for broker, thr, p50, bpc in (("bulwark", 300.0, 50.0, 9000.0), ("mosquitto", 100.0 + rnd, 100.0, 8000.0),
                                      ("rumqttd", 200.0, 80.0, 30000.0), ("bulwark-sync", 250.0, 60.0, 9000.0)):
            base = dict(broker=broker, round=rnd, pinned=True, gen_cpu_pct=50.0 + rnd, broker_cpu_pct=90.0)
            out.append(dict(base, scenario_id="fan-in-qos1", scenario="fan-in", msgs_per_s=thr,
                            lost=1 if broker == "rumqttd" and rnd == 2 else 0, duplicates=0))
            out.append(dict(base, scenario_id="latency-qos0", scenario="latency", p50_us=p50, p99_us=p50 * 4))
            out.append(dict(base, scenario_id="conn-scale-tls", scenario="conn-scale", bytes_per_conn=bpc,
                            connects_per_s=1000.0, failed=0))
    out.append(dict(scenario_id="fan-in-qos1", broker="mosquitto", round=4, pinned=True, error="boom"))
    return out


class Report(unittest.TestCase):
    def test_aggregate_and_rows(self):
        agg = bench.aggregate(fake_results(), pinned=True)
        self.assertEqual(agg[("fan-in-qos1", "mosquitto")]["msgs_per_s"], 102.0)
        self.assertEqual(agg[("fan-in-qos1", "mosquitto")]["errors"], ["boom"])
        self.assertEqual(agg[("fan-in-qos1", "rumqttd")]["lost_total"], 1)
        self.assertEqual(bench.aggregate(fake_results(), pinned=False), {})
        rows = bench.build_rows(agg, bench.ALL_BROKERS)
        by = {(r["row"].scenario, r["row"].field): r for r in rows}
        self.assertAlmostEqual(by[("fan-in-qos1", "msgs_per_s")]["ratio"], 300.0 / 102.0)
        self.assertEqual(by[("fan-in-qos1", "msgs_per_s")]["verdict"], "PASS")
        self.assertEqual(by[("fan-in-qos1", "lost")]["verdict"], "PASS")
        self.assertAlmostEqual(by[("latency-qos0", "p50_us")]["ratio"], 0.5)
        self.assertAlmostEqual(by[("latency-qos0", "p50_us")]["norm"], 2.0)
        self.assertEqual(by[("conn-scale-tls", "bytes_per_conn")]["verdict"], "PASS")  # 9000 <= 1.5*8000
        problems = bench.loud_problems(agg)
        self.assertTrue(any("rumqttd LOST 1 QoS1" in p for p in problems), problems)
        # rumqttd lost a QoS 1 message: shown with ‡, no reference (mosquitto's 102 is).
        self.assertEqual(by[("fan-in-qos1", "msgs_per_s")]["lossy"], {"rumqttd"})
        table = bench.markdown_table(rows, bench.ALL_BROKERS)
        self.assertIn("200 (gen 52%) ‡", table)
        self.assertIn("| fan-in-qos1 | msgs/s (↑) | 300 (gen 52%)", table)
        self.assertIn("**1 LOST**", table)
        # Every round's lowest and highest figure, and whether Bulwark's and its
        # reference's ranges overlap.
        self.assertEqual(by[("fan-in-qos1", "msgs_per_s")]["spread"]["mosquitto"], (101.0, 103.0))
        self.assertEqual(by[("fan-in-qos1", "msgs_per_s")]["reference"], "mosquitto")
        spread = bench.spread_table(rows, bench.ALL_BROKERS)
        self.assertIn("| fan-in-qos1 | msgs/s | 300 – 300 |", spread)
        self.assertIn("| ≥ best peer | apart: meets it in every round |", spread)
        # Memory: 9,000 against 1.5 × 8,000.
        self.assertIn("| conn-scale-tls | bytes/conn | 9,000 – 9,000 | 9,000 – 9,000 | 8,000 – 8,000 | 30,000 – 30,000 "
                      "| ≤ 1.5 × mosquitto | apart: meets it in every round |", spread)
        self.assertNotIn("QoS1 lost", spread)
        overlapping = [dict(r, broker="bulwark", msgs_per_s=102.0 + r["round"]) if r.get("broker") == "bulwark"
                       else r for r in fake_results()]
        rows = bench.build_rows(bench.aggregate(overlapping, pinned=True), bench.ALL_BROKERS)
        self.assertIn("| fan-in-qos1 | msgs/s | 103 – 105 | 250 – 250 | 101 – 103 | 200 – 200 | ≥ best peer | overlap",
                      bench.spread_table(rows, bench.ALL_BROKERS))
        worse = [dict(r, p50_us=200.0) if r.get("broker") == "bulwark" and "p50_us" in r else r
                 for r in fake_results()]
        rows = bench.build_rows(bench.aggregate(worse, pinned=True), bench.ALL_BROKERS)
        self.assertIn("| latency-qos0 | p50 µs | 200 – 200 | 60 – 60 | 100 – 100 | 80 – 80 | ≤ mosquitto | apart: misses it",
                      bench.spread_table(rows, bench.ALL_BROKERS))


class Svg(unittest.TestCase):
    def test_valid_xml_with_bars_and_unity_line(self):
        bars = [("fan-in-qos0 msgs/s", 1.5, "PASS"), ("latency <p50> & more", 0.5, "FAIL"),
                ("retained msgs/s", None, "—"), ("huge", 100.0, "PASS"), ("tiny", 0.001, "FAIL")]
        svg = bench.svg_chart(bars)
        root = ET.fromstring(svg)
        self.assertTrue(root.tag.endswith("svg"))
        ns = "{http://www.w3.org/2000/svg}"
        rects = root.findall(f"{ns}rect")
        self.assertEqual(len(rects), 1 + 4)  # background + one per bar with a value
        texts = [t.text for t in root.iter(f"{ns}text")]
        self.assertIn("latency <p50> & more", texts)
        self.assertIn("n/a", texts)
        for r in rects:
            self.assertGreaterEqual(float(r.get("width")), 1.0)

    def test_empty_chart_is_valid(self):
        ET.fromstring(bench.svg_chart([]))


if __name__ == "__main__":
    unittest.main()
