# Exact readiness for unicorn-shim under Puma (cluster mode). Add to config/puma.rb:
#
#   require "unicorn_shim_puma"
#
# The shim puts this file on RUBYLIB for its masters. The master says hello
# when the config loads; each worker reports once its server runs (after
# on_worker_boot, which keeps working as before). Outside the shim
# (no UNICORN_SHIM_CHANNEL) it does nothing.
#
# Under the shim it also mends two things of Puma 5's graceful stop that a
# hand-over meets every time:
# - a connection accepted just before the stop whose request has not arrived
#   yet is closed without an answer (puma/puma#2398): it now gets a moment
#   (SHUTDOWN_GRACE, shared by all such connections) for its request, which
#   is then served;
# - a worker whose master died exits at once (exit!), cutting the requests it
#   holds: it now finishes them first, as Unicorn's and Gunicorn's workers do;
# - the pid file is deleted whatever it names, and after a reload it names the
#   new master: a master now deletes it only when it names that master.
require_relative "unicorn_shim"   # UnicornShim.say; does nothing else outside Unicorn

module UnicornShimPuma
  SHUTDOWN_GRACE = 0.2   # seconds; a request follows its connection within a round trip

  class << self
    attr_accessor :worker   # "worker=N workers=M" in a worker process, nil in the master
  end

  module WorkerIdentity
    def run
      UnicornShimPuma.worker = "worker=#{index} workers=#{@options[:workers]}"
      super
    end

    # The worker's parent-watching thread logs this line, then calls exit!: the
    # only place to step in before it.
    def log(str)
      super
      @server.stop(true) if @server && str.to_s.start_with?("! Detected parent died")
    end
  end

  # Server#run returns once the accept loop's thread is started on the
  # inherited sockets. The master runs a Server too (the control app): it
  # has no worker identity and stays quiet.
  module ServerReady
    def run(*args, **kwargs, &block)
      thread = super
      UnicornShim.say("ready #{UnicornShimPuma.worker}") if UnicornShimPuma.worker
      thread
    end
  end

  # Puma's reactor hands its connections back at shutdown, when queue_requests
  # is turned off: one that has sent nothing yet is closed unless it gets here.
  module ServeFreshConnections
    def reactor_wakeup(client)
      if !@queue_requests && client.can_close? && client.instance_variable_get(:@requests_served).to_i.zero?
        now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        @unicorn_shim_grace_until ||= now + SHUTDOWN_GRACE
        left = @unicorn_shim_grace_until - now
        client.io.wait_readable(left) if left > 0
      end
      super
    end
  end

  module OwnPidFileOnly
    def delete_pidfile
      path = @options[:pidfile]
      super unless path && File.exist?(path) && File.read(path).to_i != Process.pid
    rescue SystemCallError
      # gone meanwhile, or unreadable: nothing of ours to delete
    end
  end
end

if UnicornShimChannel::IO_ && defined?(Puma::Cluster::Worker) && defined?(Puma::Server)
  Puma::Cluster::Worker.prepend(UnicornShimPuma::WorkerIdentity)
  Puma::Server.prepend(UnicornShimPuma::ServerReady)
  Puma::Server.prepend(UnicornShimPuma::ServeFreshConnections)
  Puma::Launcher.prepend(UnicornShimPuma::OwnPidFileOnly) if defined?(Puma::Launcher)
  UnicornShim.say("hello")
end
