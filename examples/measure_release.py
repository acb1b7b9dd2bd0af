#!/usr/bin/env python3
"""Release-build measurements for docs/BENCHMARKS.md: binary size, start-up time to ready
(spawn until GET /healthz answers 200, median of N starts on a fresh data dir each) and idle RSS
(VmRSS two seconds after ready, median).

Usage: cargo build --release && python3 examples/measure_release.py [target/release/taproom] [N]
"""
import os, socket, statistics, subprocess, sys, tempfile, time

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/taproom"
N = int(sys.argv[2]) if len(sys.argv) > 2 else 10


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    starts, rss = [], []
    for _ in range(N):
        with tempfile.TemporaryDirectory() as data:
            port = free_port()
            env = dict(os.environ, TAPROOM_JWT_SECRET="bench-secret", TAPROOM_LOG="warn")
            env.pop("TAPROOM_CONFIG", None)
            t0 = time.perf_counter()
            p = subprocess.Popen([BIN, "serve", "--listen", f"127.0.0.1:{port}",
                                  "--data-dir", data], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while not healthy(port):
                if p.poll() is not None:
                    sys.exit("server exited")
                time.sleep(0.0005)
            starts.append((time.perf_counter() - t0) * 1000)
            time.sleep(2)
            rss.append(rss_kib(p.pid))
            p.terminate()
            p.wait()
    size = os.path.getsize(BIN)
    print(f"binary size: {size} bytes ({size / 1048576:.1f} MiB)")
    print(f"start-up to ready: median {statistics.median(starts):.1f} ms, "
          f"min {min(starts):.1f}, max {max(starts):.1f} (n={N})")
    print(f"idle RSS: median {statistics.median(rss) / 1024:.1f} MiB, "
          f"min {min(rss) / 1024:.1f}, max {max(rss) / 1024:.1f}")


if __name__ == "__main__":
    main()
