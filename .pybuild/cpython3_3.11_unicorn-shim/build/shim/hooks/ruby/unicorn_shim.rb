# Exact readiness for unicorn-shim. Add to the Unicorn config:
#
#   require "unicorn_shim"     # or: require "/usr/share/unicorn-shim/ruby/unicorn_shim"
#
# The master says hello when the config loads; each worker reports once it is
# ready to accept (after after_worker_ready, which keeps working as before).
# Outside the shim (no UNICORN_SHIM_READY_SOCKET) it does nothing.
require "socket"

module UnicornShim
  PATH = ENV["UNICORN_SHIM_READY_SOCKET"]

  def self.say(text)
    return unless PATH
    sock = Socket.new(:UNIX, :DGRAM)
    sock.send(text, 0, Socket.sockaddr_un(PATH))
  rescue SystemCallError
    # the shim is gone or restarting: readiness falls back to its heuristic
  ensure
    sock&.close
  end

  # Wraps whatever after_worker_ready the config sets (the Configurator sets
  # it always, to its default when the config says nothing).
  module ReadyHook
    def after_worker_ready=(hook)
      super(lambda do |server, worker|
        hook.call(server, worker)
        UnicornShim.say("ready worker=#{worker.nr} workers=#{server.worker_processes}")
      end)
    end
  end
end

if defined?(Unicorn::HttpServer)
  Unicorn::HttpServer.prepend(UnicornShim::ReadyHook)
  UnicornShim.say("hello")
end
