#!/usr/bin/env python3
# burst.py SOCKET N BASEPORT (REPRO.md's burst; run.sh runs it): N
# threads, each POST /v1/ports (tcp or udp, 127.0.0.1:BASEPORT+i -> 80)
# then DELETE /v1/ports/ID on a fresh connection; then GET /v1/ports.
# Prints what failed and what is left.
import http.client, json, socket, sys, threading, collections

class UnixConn(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self.path = path
    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        self.sock = s

def call(path, method, url, body=None):
    c = UnixConn(path)
    try:
        hdr = {"Content-Type": "application/json"} if body is not None else {}
        c.request(method, url, body=body, headers=hdr)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()

path, n, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fails = collections.Counter()
ok = [0]
lock = threading.Lock()
start = threading.Barrier(n)

def pair(i):
    proto = "tcp" if i % 2 == 0 else "udp"
    spec = json.dumps({"proto": proto, "parentIP": "127.0.0.1", "parentPort": base + i, "childPort": 80})
    start.wait()
    try:
        st, b = call(path, "POST", "/v1/ports", spec)
        if st != 201:
            with lock: fails["add %d" % st] += 1
            return
        pid = json.loads(b)["id"]
    except Exception as e:
        with lock: fails["add " + type(e).__name__] += 1
        return
    try:
        st, b = call(path, "DELETE", "/v1/ports/%d" % pid)
        if st != 200:
            with lock: fails["delete %d" % st] += 1
            return
    except Exception as e:
        with lock: fails["delete " + type(e).__name__] += 1
        return
    with lock: ok[0] += 1

ts = [threading.Thread(target=pair, args=(i,)) for i in range(n)]
for t in ts: t.start()
for t in ts: t.join()
st, b = call(path, "GET", "/v1/ports")
left = len(json.loads(b))
print("pairs answered: %d of %d; failed: %d %s; ports left published: %d" % (ok[0], n, n - ok[0], dict(fails), left))
