#!/usr/bin/env python3
"""A Modbus TCP device for keel's tests (pymodbus simulator).

usage: modbus_device.py PORT [UNIT_ID] [COUNTER_MS]

Coils, discrete inputs, holding and input registers 0..99 (zero-based
addresses), unit id 1. Input register 1 counts up every COUNTER_MS
milliseconds (a reading that changes). Commands on stdin, one per line:
  set TABLE ADDR VALUE     TABLE: co di hr ir
  get TABLE ADDR
Prints "READY PORT" once listening; answers each command on one line.
"""
import asyncio
import sys

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

PORT = int(sys.argv[1])
UNIT = int(sys.argv[2]) if len(sys.argv) > 2 else 1
COUNTER_MS = int(sys.argv[3]) if len(sys.argv) > 3 else 100
N = 100
FC = {"co": 1, "di": 2, "hr": 3, "ir": 4}


def device() -> SimDevice:
    return SimDevice(
        id=UNIT,
        simdata=(
            [SimData(address=0, count=N, values=False, datatype=DataType.BITS)],
            [SimData(address=0, count=N, values=False, datatype=DataType.BITS)],
            [SimData(address=0, count=N, values=0, datatype=DataType.REGISTERS)],
            [SimData(address=0, count=N, values=0, datatype=DataType.REGISTERS)],
        ),
    )


async def counter(ctx) -> None:
    n = 0
    while True:
        await asyncio.sleep(COUNTER_MS / 1000)
        n = (n + 1) & 0x7FFF
        await ctx.async_setValues(UNIT, FC["ir"], 1, [n])


async def commands(ctx) -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        parts = line.split()
        try:
            if parts[0] == "get":
                vals = await ctx.async_getValues(UNIT, FC[parts[1]], int(parts[2]), 1)
                print(f"{parts[1]} {parts[2]} = {int(vals[0])}", flush=True)
            elif parts[0] == "set":
                table, addr, val = parts[1], int(parts[2]), int(parts[3])
                v = bool(val) if table in ("co", "di") else val & 0xFFFF
                err = await ctx.async_setValues(UNIT, FC[table], addr, [v])
                print("ok" if err is None else f"err {err}", flush=True)
            else:
                print(f"err unknown command {parts[0]}", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"err {exc!r}", flush=True)


async def main() -> None:
    server = ModbusTcpServer(device(), address=("127.0.0.1", PORT))
    ctx = server.context
    task = asyncio.create_task(server.serve_forever())
    await asyncio.sleep(0.2)
    print(f"READY {PORT}", flush=True)
    asyncio.create_task(counter(ctx))
    asyncio.create_task(commands(ctx))
    await task


if __name__ == "__main__":
    asyncio.run(main())
