/* `integration-worker dlq ...`: the ops commands on the dead-letter queue
 * N.dead (list, stats, show, replay, export, purge).
 *
 * Every command reads N.dead through one consumer on one channel with manual
 * acks and a prefetch that covers the messages it reads, acts on the selected
 * ones (a replay is acked only after the broker confirmed its republish; a
 * purge only after its export is on disk), and returns the untouched ones by
 * closing the channel: a RabbitMQ quorum queue then puts them back in the
 * order they were delivered, ahead of anything newer, so their order is
 * unchanged.  A process killed at any point leaves its unacked deliveries to
 * the broker, which returns them the same way. */
#ifndef IW_DLQ_H
#define IW_DLQ_H

/* Runs `dlq ARGS...` (argv holds what follows "dlq"); reads the settings from
 * envp like every role.  Returns the process exit code: 0 ok, 2 usage or
 * configuration error (one line on stderr naming it), 1 runtime failure. */
int dlq_main(int argc, char **argv, char **envp);

#endif
