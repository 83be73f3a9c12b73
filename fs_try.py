import asyncio, dataclasses, time, sys
from evaluations.settings import Settings
from evaluations.languages import registry
from executor.app import open_sandbox, request_limits
from bench.stack import free_uid_base

async def main():
    s = dataclasses.replace(Settings.from_env(), sandbox_uid_base=free_uid_base(), executor_concurrency=2)
    async with open_sandbox(s) as box:
        limits = request_limits(s, {})
        py = registry("/usr/bin/python3")["python"]
        for _ in range(100):
            if box.fork_servers == 2: break
            await asyncio.sleep(0.1)
        print("servers", box.fork_servers)
        for code in sys.argv[1:]:
            r = await box.run("x", py, code, limits)
            print(r.to_dict())
asyncio.run(main())
