/* moe eval: placeholder until its issue lands. */
#include <stdio.h>

#include "cli/cli.h"

int moe_cmd_eval(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    fprintf(stderr, "moe: 'eval' is not available in this build yet\n");
    return 2;
}
