"""Benchmark: 100 organisms on one shared Redis (issue 5).

Measures, on a real redis-server started here (with an admin password, no ACL file):
1. the time to provision every organism's ACL user (and to re-apply all of them unchanged);
2. the cost of one usage tick and of a whole usage round over all organisms' keys;
3. the library's append rate (RedisBackend.buffer_append) with an organism's restricted user beside
   the admin user, in the same run, interleaved, on the same server: the ACL checks' cost is the
   ratio (aim: restricted >= 0.9x admin). Both run the append as FCALL of the function library the
   operator loads; an admin backend running it as EVALSHA (the path without the library) is the
   baseline for what FCALL itself costs.

    .venv/bin/python bench/tenancy.py [--organisms 100] [--threads 40] [--appends 1000] [--rounds 30]
"""
from __future__ import annotations

import argparse
import secrets
import statistics
import time

import redis

from xml_pipeline.memory import BackendConfig
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline_operator.tenancy import acl, functions
from xml_pipeline_operator.tenancy.cleanup import cleanup_prefix
from xml_pipeline_operator.tenancy.recovery import DesiredUser, UserRecovery
from xml_pipeline_operator.tenancy.usage import TickCost, UsageSampler

from benchkit import BenchRedis  # noqa: E402  (bench/ is the script directory)

SIGNING_KEY = secrets.token_hex(16)


def backend(port: int, prefix: str, username: str | None, password: str) -> RedisBackend:
    return RedisBackend(BackendConfig(backend_type="redis", redis_url=f"redis://127.0.0.1:{port}/0",
                                      redis_prefix=prefix, redis_ttl=3600, redis_username=username,
                                      redis_password=password, signing_key=SIGNING_KEY))


def append_rate(b: RedisBackend, n: int, tag: str) -> float:
    slot = b"x" * 200
    t0 = time.perf_counter()
    for i in range(n):
        b.buffer_append(f"{tag}-{i % 50}", slot)
    return n / (time.perf_counter() - t0)


def full_round(sampler: UsageSampler, orgs: list[tuple[str, str, str]]) -> list[TickCost]:
    """Every tick of one complete usage round over `orgs` (username, password, prefix)."""
    sampler.set_tenants({u: p for u, _, p in orgs})
    ticks = []
    while True:
        ticks.append(sampler.tick())
        if ticks[-1].round_completed:
            return ticks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organisms", type=int, default=100)
    ap.add_argument("--threads", type=int, default=40, help="threads per organism for the usage tick")
    ap.add_argument("--appends", type=int, default=1000, help="appends per block")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved admin/restricted block pairs")
    args = ap.parse_args()

    admin_pw = secrets.token_urlsafe(16)
    server = BenchRedis(password=admin_pw, name="tenancy")
    port = server.port
    admin = redis.Redis(port=port, password=admin_pw)
    try:
        version = admin.info("server")["redis_version"]
        print(f"redis-server {version} on 127.0.0.1:{port}, {args.organisms} organisms\n")
        orgs = [(acl.username_for("bench", f"org{i}"), secrets.token_urlsafe(24), f"xp:bench.org{i}:")
                for i in range(args.organisms)]

        # 1. Provisioning.
        t0 = time.perf_counter()
        profile = acl.server_profile(admin)
        for user, pw, prefix in orgs:
            acl.ensure_user(admin, user, pw, prefix, profile=profile)
        provision = time.perf_counter() - t0
        t0 = time.perf_counter()
        changes = {acl.ensure_user(admin, u, pw, p, profile=profile) for u, pw, p in orgs}
        reapply = time.perf_counter() - t0
        assert changes == {acl.Change.UNCHANGED}
        recovery = UserRecovery(admin)
        desired = [DesiredUser(u, p, pw) for u, pw, p in orgs]
        recovery.check(desired)
        t0 = time.perf_counter()
        recovery.check(desired)
        check = time.perf_counter() - t0
        for u, _, _ in orgs:
            acl.delete_user(admin, u)
        t0 = time.perf_counter()
        report = recovery.check(desired)  # as after a restart that lost every user
        recreate = time.perf_counter() - t0
        assert len(report.recreated) == len(orgs)
        print("provisioning")
        print(f"  create {len(orgs)} ACL users            {provision * 1000:8.1f} ms  "
              f"({provision / len(orgs) * 1000:.2f} ms each, incl. one server profile)")
        print(f"  re-apply all, unchanged          {reapply * 1000:8.1f} ms  (one ACL GETUSER each, no writes)")
        print(f"  periodic lost-user check         {check * 1000:8.1f} ms  (INFO server + ACL USERS + FCALL_RO)")
        print(f"  re-create all after a loss       {recreate * 1000:8.1f} ms")

        # 2. Usage: every organism writes `threads` threads through its own restricted backend.
        t0 = time.perf_counter()
        for user, pw, prefix in orgs:
            with backend(port, prefix, user, pw) as b:
                for t in range(args.threads):
                    b.buffer_append(f"t-{t}", b"s" * 300)
                    b.registry_set(f"console.l{t}", f"t-{t}")
        fill = time.perf_counter() - t0
        dbsize = admin.dbsize()
        sampler = UsageSampler(admin)
        ticks = full_round(sampler, orgs)
        usage = sampler.latest
        sample = usage[orgs[0][0]]
        assert sample.threads == args.threads, sample
        small_ticks = full_round(UsageSampler(admin, keys_per_tick=2000, memory_samples_per_tick=16), orgs)
        print(f"\nusage ({dbsize} keys in the server, filled in {fill:.1f} s through {len(orgs)} restricted users)")
        first = ticks[0]
        print(f"  one tick, default budget         {first.seconds * 1000:8.1f} ms  ({first.keys_scanned} keys "
              f"scanned in {first.scan_calls} SCAN calls, {first.memory_calls} MEMORY USAGE)")
        print(f"  whole round, default budget      {sum(c.seconds for c in ticks) * 1000:8.1f} ms  "
              f"in {len(ticks)} tick(s)")
        med = statistics.median(c.seconds for c in small_ticks)
        print(f"  one tick, budget 2000 keys/16 MU {med * 1000:8.1f} ms  (median; round in {len(small_ticks)} ticks)")
        print(f"  e.g. {orgs[0][0]}: threads={sample.threads} keys={sample.keys} ~{sample.approx_bytes} B")

        # 3. Append rate: admin vs restricted, same server, interleaved rounds. Two views: the
        # client's end-to-end rate (noisy on a shared machine: best of the rounds), and the server's
        # own time per append script (commandstats usec_per_call of EVALSHA), which is where the ACL
        # checks run: once for EVALSHA, once per command and key inside the script.
        user, pw, prefix = orgs[0]
        rates: dict[str, list[float]] = {"admin": [], "restricted": [], "evalsha": []}
        usec: dict[str, list[float]] = {"admin": [], "restricted": [], "evalsha": []}
        # A backend probes the mechanism once: made while the library is away, it keeps EVALSHA.
        admin.execute_command("FUNCTION", "DELETE", functions.library().name)
        b_eval = backend(port, "xp:bench.evalsha:", None, admin_pw)
        append_rate(b_eval, 500, "warm")
        functions.ensure_library(admin)
        with b_eval, backend(port, "xp:bench.admin:", None, admin_pw) as b_admin, \
                backend(port, prefix, user, pw) as b_user:
            append_rate(b_admin, 500, "warm")
            append_rate(b_user, 500, "warm")
            assert (b_eval.script_mechanism, b_admin.script_mechanism, b_user.script_mechanism) == \
                ("eval", "fcall", "fcall")
            for r in range(args.rounds):
                trio = [("admin", b_admin, "fcall"), ("restricted", b_user, "fcall"), ("evalsha", b_eval, "evalsha")]
                for name, b, cmd in (trio if r % 2 == 0 else trio[::-1]):
                    admin.config_resetstat()
                    rates[name].append(append_rate(b, args.appends, f"r{r}"))
                    usec[name].append(float(admin.info("commandstats")[f"cmdstat_{cmd}"]["usec_per_call"]))
        a, u = max(rates["admin"]), max(rates["restricted"])
        am, um = statistics.median(rates["admin"]), statistics.median(rates["restricted"])
        # Each round's two blocks ran back to back, so their ratio sees the same machine load.
        paired = statistics.median(x / y for x, y in zip(rates["restricted"], rates["admin"]))
        sa, su = statistics.median(usec["admin"]), statistics.median(usec["restricted"])
        print(f"\nappend rate (buffer_append, 200 B slots, {args.rounds} rounds of {args.appends} per user, interleaved)")
        print(f"  admin user (default, +@all ~*)   {a:8.0f} appends/s best, {am:.0f} median; "
              f"server {sa:.2f} us per append script")
        print(f"  restricted organism user         {u:8.0f} appends/s best, {um:.0f} median; "
              f"server {su:.2f} us per append script")
        print(f"  ratio restricted/admin           {paired:8.3f}  median of per-round ratios "
              f"(best-of {u / a:.3f}); aim >= 0.90")
        print(f"  ACL cost on the server           {su - sa:8.2f} us per append ({(su - sa) / sa * 100:+.1f} % of the "
              f"script's server time)")
        e, em, se = max(rates["evalsha"]), statistics.median(rates["evalsha"]), statistics.median(usec["evalsha"])
        vs_eval = statistics.median(x / y for x, y in zip(rates["admin"], rates["evalsha"]))
        print(f"  admin user, EVALSHA (baseline)   {e:8.0f} appends/s best, {em:.0f} median; "
              f"server {se:.2f} us per append script")
        print(f"  ratio FCALL/EVALSHA (admin)      {vs_eval:8.3f}  median of per-round ratios; server "
              f"{sa - se:+.2f} us per append")

        # Cleanup of one organism, for scale.
        t0 = time.perf_counter()
        progress = cleanup_prefix(admin, prefix)
        print(f"\ncleanup of one organism          {(time.perf_counter() - t0) * 1000:8.1f} ms  "
              f"({progress.deleted} keys, {progress.batches} SCAN batches over {admin.dbsize()} keys)")
    finally:
        admin.close()
        server.stop()


if __name__ == "__main__":
    main()
