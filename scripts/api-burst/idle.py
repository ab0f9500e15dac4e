#!/usr/bin/env python3
# idle.py SOCKET N: hold N connections to SOCKET that never send; print
# "held" once they are open, then keep them until killed.
import resource, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for i in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    held.append(s)
print("held", len(held), flush=True)
while True:
    time.sleep(60)
