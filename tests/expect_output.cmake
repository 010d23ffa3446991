# Runs COMMAND (a ;-list) and fails unless it exits with EXPECT_RC and its output (stdout and
# stderr together) matches the regex EXPECT_OUTPUT. For programs whose contract is an exit code and
# a message, e.g. that `--help` prints usage and exits 0 on a machine without a GPU.
#   cmake -DCOMMAND="prog;--help" -DEXPECT_RC=0 -DEXPECT_OUTPUT="^usage: prog" -P tests/expect_output.cmake
execute_process(COMMAND ${COMMAND} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT "${rc}" STREQUAL "${EXPECT_RC}")
  message(FATAL_ERROR "${COMMAND} exited with ${rc}, expected ${EXPECT_RC}:\n${out}${err}")
endif()
if(NOT "${out}${err}" MATCHES "${EXPECT_OUTPUT}")
  message(FATAL_ERROR "${COMMAND}: output does not match '${EXPECT_OUTPUT}':\n${out}${err}")
endif()
