"""Child program of the launcher failure test: process 1 fails at once, the others wait."""

import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--exit-code", type=int, required=True)
code = parser.parse_args().exit_code
process_id = int(os.environ["MOE_LVLM_PROCESS_ID"])
if process_id == 1:
    print(f"process {process_id} failing with {code}", flush=True)
    sys.exit(code)
time.sleep(120)
