"""Drives skiff's QMP socket with QEMU's own client library (qemu.qmp), as
QEMU tooling does, and prints what it saw, a line each, for
tests/tests/qmp_client.rs to assert on. Argument: the socket's path."""

import asyncio
import sys

from qemu.qmp import EventListener, ExecuteError, QMPClient


async def event(listener, name):
    """The next event named NAME (others are skipped), within 10 s."""
    while True:
        ev = await asyncio.wait_for(listener.get(), 10)
        if ev["event"] == name:
            return ev


async def main(sock):
    qmp = QMPClient("skiff-test")
    await qmp.connect(sock)
    print("GREETING", qmp.greeting.QMP.version["qemu"]["major"])
    status = await qmp.execute("query-status")
    print("STATUS", status["status"], status["running"])
    names = sorted(c["name"] for c in await qmp.execute("query-commands"))
    print("COMMANDS", ",".join(names))
    keys = [
        {"type": "key", "data": {"down": down, "key": {"type": "qcode", "data": "a"}}}
        for down in (True, False)
    ]
    await qmp.execute("input-send-event", {"events": keys})
    print("KEYS sent")
    try:
        await qmp.execute("input-send-event", {"device": "nokbd", "events": keys})
        print("KEYS-TO-MISSING accepted")
    except ExecuteError as e:
        print("KEYS-TO-MISSING", e.error_class)
    try:
        await qmp.execute("no-such-command")
    except ExecuteError as e:
        print("UNKNOWN", e.error_class)
    listener = EventListener()
    with qmp.listen(listener):
        await qmp.execute("system_powerdown")
        print("EVENT", (await event(listener, "POWERDOWN"))["event"])
        await qmp.execute("system_reset")
        ev = await event(listener, "RESET")
        print("EVENT", ev["event"], ev["data"]["reason"])
        status = await qmp.execute("query-status")
        print("STATUS-AFTER-RESET", status["status"])
        await qmp.execute("quit")
        ev = await event(listener, "SHUTDOWN")
        print("EVENT", ev["event"], ev["data"]["reason"])
    # As with QEMU, quit closes the connection from skiff's side.
    try:
        await qmp.disconnect()
    except EOFError:
        pass
    print("DONE")


asyncio.run(main(sys.argv[1]))
